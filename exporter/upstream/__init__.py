"""What llmtap learns from the upstream server itself, off the request path."""

"""Training the learned light/heavy classifier: tasks with verifiable answers, their labels
from the operator's own local model, and the fit (`llmtap classifier tasks | train`)."""

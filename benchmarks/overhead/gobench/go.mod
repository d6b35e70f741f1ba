module llmtap.invalid/gobench

go 1.26

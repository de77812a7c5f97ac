"""Evaluation: held-out loss, generation metrics and the report of a run or checkpoint, and the tools
around them (compare, review, chat, the forgetting check, sweep summaries).
README.md here: its modules, public names and data flow."""

"""`posttrain plan`: a dry run of a whole recipe (plan/dry_run.py). Not a DVC stage: it
reads every stage's own code to size a run, so it sits above them."""

"""The sft and pref stages: TRL trainers inside Ray Train workers."""

"""cftune inside other tools' training loops (`trl`: TRL's SFTTrainer with the CF term)."""

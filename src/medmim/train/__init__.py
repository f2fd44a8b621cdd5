"""Training: one engine for MAE / SimMIM / SimCLR pretraining and UNETR fine-tuning."""

"""Where checkpoints live (a folder or S3) and their format."""

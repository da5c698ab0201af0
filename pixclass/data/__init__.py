"""Data: scan class folders and split them, decode files, turn pixels into tensors, load batches."""

"""The engines that turn images into feature chunks: CPU (DataLoader workers), GPU (decode on the device), augmented views."""

"""What is served: repository scanning, version policies, the model manager."""

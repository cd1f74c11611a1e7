"""babysit: train neural networks the CS231n way, as Prefect flows tracked in MLflow."""

"""The web service: a JSON API and an upload page over a saved model."""

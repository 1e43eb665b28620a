"""Worker processes: run the service's handlers on requests read from the rings."""

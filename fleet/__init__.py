"""Fleet management server and `fleet` console."""

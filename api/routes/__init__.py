"""One router per resource of the Loops REST API v1."""

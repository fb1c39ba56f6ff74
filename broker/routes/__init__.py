"""One router module per resource; each route is a few lines calling a service."""

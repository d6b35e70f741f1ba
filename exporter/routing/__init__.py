"""The router: sends each request to the backend that will serve it soonest."""

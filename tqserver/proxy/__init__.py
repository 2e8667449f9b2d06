"""The public HTTP side: a twisted.web Site that routes each request by prefix and streams it
to a worker instance, or answers it itself (static files, errors)."""

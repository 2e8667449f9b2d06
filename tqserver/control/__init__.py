"""What TQServer answers about itself: /health, /metrics, the /_tqserver admin API and status
page, live-reload events."""

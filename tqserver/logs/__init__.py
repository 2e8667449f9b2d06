"""Log files: templates with {date} and {name}, and the server's log observer."""

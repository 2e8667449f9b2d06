"""``tqserver``: the command line of a running server (status, reload, logs, top), for
the habits of PM2 and supervisorctl users. It talks to the control plane over HTTP."""

"""bin/deploy: releases shipped to a target with rsync (a local directory or a host over
ssh), Capistrano-style — ``releases/<name>/`` directories, a ``current`` symlink the server
runs from (``--root <root>/current``), ``shared/`` for what every release writes — then a
HUP, and a wait until /health says every worker serves the new release. A failure leaves
(or puts back) the previous release serving; ``--rollback`` switches back on purpose;
``--rolling`` does one node at a time, drained through HAProxy's runtime API.

A command-line tool, not part of the server: it blocks on its child processes and on HTTP
polls, and nothing of the server imports it."""

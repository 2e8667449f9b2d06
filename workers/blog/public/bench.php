<?php
// A tiny fixed body, for measuring the FastCGI path (wrk -t1 -c8 -d5s .../blog/bench.php).
header('Content-Type: text/plain');
echo "Hello, World!\n";

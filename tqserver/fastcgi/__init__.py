"""FastCGI for PHP workers: the record codec, a kept-alive client for php-fpm, and the proxy's
Forward that speaks it."""

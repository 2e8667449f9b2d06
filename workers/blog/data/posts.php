<?php
// The blog's posts: a plain array, newest first. Edit it and reload the page (dev mode
// shows the change at once: php-fpm reads scripts and data on every request).
return [
    [
        'slug' => 'php-behind-twisted',
        'title' => 'PHP behind a Twisted proxy',
        'date' => '2026-11-20',
        'summary' => 'How a request for /blog/ becomes a FastCGI request to php-fpm.',
        'body' => [
            'TQServer starts one php-fpm master per instance of this worker, from a configuration it generates under run/php/. The proxy speaks FastCGI to it directly: no web server sits in between.',
            'Static files such as style.css are answered by the proxy itself; PHP files are only ever executed, never served as text.',
        ],
    ],
    [
        'slug' => 'front-controllers',
        'title' => 'Front controllers and PATH_INFO',
        'date' => '2026-11-12',
        'summary' => 'Any path that is not a file lands in index.php, which routes it.',
        'body' => [
            'This very page is /blog/post/front-controllers: there is no such file, so index.php runs with PATH_INFO set to /post/front-controllers and picks the post.',
            'A script can take extra path too: /blog/form.php/anything runs form.php with PATH_INFO=/anything.',
        ],
    ],
    [
        'slug' => 'zero-downtime',
        'title' => 'Reloading without dropping a request',
        'date' => '2026-11-02',
        'summary' => 'kill -HUP swaps in a fresh php-fpm pool while the old one drains.',
        'body' => [
            'In production, SIGHUP starts a new php-fpm on a fresh port, waits for its ping to answer pong, switches the route, then lets the old pool finish what it was doing.',
        ],
    ],
];

<?php
// The front controller: /blog/ lists the posts, /blog/post/<slug> shows one. Any path
// that is not a file under public/ comes here, with the path in PATH_INFO.
require __DIR__ . '/../views/layout.php';

$posts = require __DIR__ . '/../data/posts.php';
$path = $_SERVER['PATH_INFO'] ?? '';
$b = e(base());

if ($path === '' || $path === '/') {
    $items = '';
    foreach ($posts as $post) {
        $items .= '<article class="card"><time>' . e($post['date']) . '</time>'
            . '<h2><a href="' . $b . '/post/' . e($post['slug']) . '">' . e($post['title']) . '</a></h2>'
            . '<p>' . e($post['summary']) . '</p></article>';
    }
    page('Posts', '<h1>Posts</h1>' . $items);
    return;
}

if (preg_match('#^/post/([a-z0-9-]+)/?$#', $path, $m)) {
    foreach ($posts as $post) {
        if ($post['slug'] === $m[1]) {
            $paragraphs = implode('', array_map(fn ($p) => '<p>' . e($p) . '</p>', $post['body']));
            page($post['title'], '<article class="post"><time>' . e($post['date']) . '</time>'
                . '<h1>' . e($post['title']) . '</h1>' . $paragraphs
                . '<p class="back"><a href="' . $b . '/">&larr; All posts</a></p></article>');
            return;
        }
    }
}

page('Not found', '<h1>Not found</h1><p class="card">Nothing here at <code>' . e($path)
    . '</code>. <a href="' . $b . '/">Back to the posts</a>.</p>', 404);

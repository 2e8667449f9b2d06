<?php
// Shared page chrome. Lives outside public/, so it can be included but never requested.

function e(string $text): string
{
    return htmlspecialchars($text, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

/** The URL prefix this worker is mounted at ("/blog"), from the script's own URL. */
function base(): string
{
    return rtrim(dirname($_SERVER['SCRIPT_NAME'] ?? '/'), '/');
}

function page(string $title, string $body, int $status = 200): void
{
    http_response_code($status);
    header('Content-Type: text/html; charset=utf-8');
    $b = e(base());
    $nav = [
        '/' => 'Posts',
        '/form.php' => 'Guestbook form',
        '/cookies.php' => 'Cookies',
    ];
    $links = '';
    foreach ($nav as $href => $label) {
        $links .= '<a href="' . $b . $href . '">' . e($label) . '</a>';
    }
    $worker = e(getenv('WORKER_INSTANCE') ?: 'blog');
    $php = e(PHP_VERSION);
    echo <<<HTML
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{$title} · TQServer blog</title>
<link rel="stylesheet" href="{$b}/style.css">
</head>
<body>
<header class="top">
  <a class="brand" href="{$b}/"><span>TQ</span> blog</a>
  <nav>{$links}</nav>
</header>
<main>
{$body}
</main>
<footer>Served by PHP {$php} on php-fpm, instance <code>{$worker}</code>, behind TQServer.</footer>
</body>
</html>
HTML;
}

<?php
// Sets two cookies on every visit (two Set-Cookie headers) and shows the ones that came back.
require __DIR__ . '/../views/layout.php';

$visits = (int) ($_COOKIE['visits'] ?? 0) + 1;
setcookie('visits', (string) $visits, ['path' => base() . '/', 'httponly' => true, 'samesite' => 'Lax']);
setcookie('theme', 'sunrise', ['path' => base() . '/', 'samesite' => 'Lax']);

$rows = '';
foreach ($_COOKIE as $name => $value) {
    $rows .= '<tr><th>' . e((string) $name) . '</th><td>' . e((string) $value) . '</td></tr>';
}
page('Cookies', '<h1>Cookies</h1><section class="card"><p>This page set <code>visits=' . $visits
    . '</code> and <code>theme=sunrise</code>.</p>'
    . ($rows ? '<h2>Your browser sent</h2><table>' . $rows . '</table>' : '<p>Your browser sent none yet: reload the page.</p>')
    . '</section>');

<?php
// A form that POSTs to itself and shows what arrived.
require __DIR__ . '/../views/layout.php';

$b = e(base());
$shown = '';
if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $rows = '';
    foreach ($_POST as $name => $value) {
        $rows .= '<tr><th>' . e((string) $name) . '</th><td>' . e(is_array($value) ? implode(', ', $value) : (string) $value) . '</td></tr>';
    }
    $length = (int) ($_SERVER['CONTENT_LENGTH'] ?? 0);
    $shown = '<section class="card posted"><h2>You posted</h2>'
        . ($rows ? '<table>' . $rows . '</table>' : '<p>No form fields.</p>')
        . '<p class="meta">' . $length . ' bytes of ' . e($_SERVER['CONTENT_TYPE'] ?? 'no content type') . '</p></section>';
}

page('Guestbook form', <<<HTML
<h1>Guestbook</h1>
<form class="card" method="post" action="{$b}/form.php">
  <label>Name <input name="name" required maxlength="80" placeholder="Ada"></label>
  <label>Message <textarea name="message" rows="4" placeholder="Hello from the browser"></textarea></label>
  <button type="submit">Post it</button>
</form>
{$shown}
HTML);

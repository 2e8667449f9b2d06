"""Notes: a form that POSTs, a redirect, a cookie session, a template and a static file,
all under the route TQServer mounts the app at, with nothing in the app about it."""

import os

from flask import Flask, redirect, render_template, request, session, url_for

app = Flask(__name__)
# A fixed key keeps sessions valid across hot reloads in dev; set FLASK_SECRET_KEY in prod.
app.secret_key = os.environ.get("FLASK_SECRET_KEY", "dev only: not a secret")


@app.get("/")
def index():
    return render_template("index.html", notes=session.get("notes", []))


@app.post("/notes")
def add_note():
    text = request.form.get("text", "").strip()
    if text:
        session["notes"] = [*session.get("notes", []), text][-20:]
    return redirect(url_for("index"))


@app.post("/notes/clear")
def clear_notes():
    session.pop("notes", None)
    return redirect(url_for("index"))

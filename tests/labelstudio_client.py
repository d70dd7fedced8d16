"""Label Studio SDK steps of the Label Studio tests, run by the Label Studio venv's python.

label-studio-sdk lives in the server's venv (its pins differ from ours), so the tests run this
script there: ``python labelstudio_client.py REQUEST.json`` with REQUEST =
``{"url", "token", "title", "config" (XML), "tasks" (path of a JSON task list), "storage"
(folder, or null), "ml_backend" (optional: an ML backend's URL)}``. It creates a project with the
config, a Local Files storage (so Label Studio serves the images under it; not synced) and
imports the tasks. With ``ml_backend`` it then connects that backend to the project (Label
Studio calls its /health and /setup) and runs the Data Manager action "Retrieve Predictions" on
every task (Label Studio calls its /predict). It prints, as JSON on stdout, the project's config
as the server holds it, the backend as the server records it, and every task with its
predictions, as the SDK lists them.
"""

from __future__ import annotations

import json
import sys

from label_studio_sdk import LabelStudio


def main(request_path: str) -> None:
    req = json.loads(open(request_path, encoding="utf-8").read())
    ls = LabelStudio(base_url=req["url"], api_key=req["token"])
    project = ls.projects.create(title=req["title"], label_config=req["config"])
    if req.get("storage"):
        ls.import_storage.local.create(project=project.id, path=req["storage"], title="images")
    tasks = json.loads(open(req["tasks"], encoding="utf-8").read())
    imported = ls.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    out = {"project": project.id, "imported_task_ids": list(imported.task_ids or [])}
    if req.get("ml_backend"):
        backend = ls.ml.create(project=project.id, url=req["ml_backend"], title="ddetr", is_interactive=False)
        ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
        backend = ls.ml.get(id=backend.id)
        out["ml_backend"] = {"id": backend.id, "state": str(backend.state), "error_message": backend.error_message,
                             "model_version": backend.model_version}
    out["label_config"] = ls.projects.get(id=project.id).label_config
    out["tasks"] = [
        {
            "id": t.id,
            "data": t.data,
            "predictions": [
                {"model_version": p.model_version, "score": p.score, "result": p.result}
                for p in (t.predictions or [])
            ],
        }
        for t in ls.tasks.list(project=project.id, fields="all")
    ]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])

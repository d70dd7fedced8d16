"""Label Studio SDK steps of the round-trip test, run by the Label Studio venv's python.

label-studio-sdk lives in the server's venv (its pins differ from ours), so the test runs this
script there: ``python labelstudio_client.py REQUEST.json`` with REQUEST =
``{"url", "token", "title", "config" (XML), "tasks" (path of labelstudio.json), "storage"
(folder, or null)}``. It creates a project with the config, a Local Files storage (so Label Studio
serves the images under it; not synced), imports the tasks and prints, as JSON on stdout, the
project's config as the server holds it and every task with its predictions, as the SDK lists them.
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
    out = {
        "project": project.id,
        "label_config": ls.projects.get(id=project.id).label_config,
        "imported_task_ids": list(imported.task_ids or []),
        "tasks": [
            {
                "id": t.id,
                "data": t.data,
                "predictions": [
                    {"model_version": p.model_version, "score": p.score, "result": p.result}
                    for p in (t.predictions or [])
                ],
            }
            for t in ls.tasks.list(project=project.id, fields="all")
        ],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])

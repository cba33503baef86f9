"""`helios serve`: an OpenAI-style video API, a live steerable stream, and a web page, around one loaded pipeline.

app.py (routes) -> jobs.py (the queue and the worker thread that consumes HeliosPipeline.stream) -> storage.py (jobs
in --data-dir); realtime.py (the WebSocket); params.py (request bodies -> the generation plan); security.py (API key,
body limits); errors.py (OpenAI's error shape); static/ (the page). Started by cli/serve.py.
An app layer: it imports from the library layers (model/, sampling/, scale/, pipeline/), never from cli/ or bench/.
"""

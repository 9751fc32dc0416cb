"""An OpenAI-compatible HTTP server (`bitlm serve`): the HTTP layer (app.py: routes, guard, errors;
schemas.py: the wire format; settings.py) and the scheduler that drives a many-sequence engine
(scheduler.py). Needs the `serve` extra (fastapi, uvicorn); nothing else in bitlm imports this package."""

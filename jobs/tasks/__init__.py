"""Tasks: the registry that ``@task`` fills, and the built-in tasks.

``builtin`` (echo, sleep), ``images`` (crop-image, Pillow), ``llm`` (Gemini
through google-genai) and ``workflow`` (execute-workflow: a React Flow graph
run node by node as child runs).
"""

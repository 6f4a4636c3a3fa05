"""`python -m engine.process RUNTIME_DIR`: how the supervisor starts the engine."""
from engine.process.main import main

main()

"""Every MLflow helper of the project: runs (``runs``), model references and the registry
(``refs``), metric names (``names``). Imports MLflow only where a function needs it."""

"""The ground floor: settings, errors, logs, metrics, who this process is, and the page
and outcome types every stage shares. Imports nothing else of the watcher."""

"""The ``cybersec`` command line: administration (migrate) and, later, a client of the API."""

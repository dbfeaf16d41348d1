"""What a run reports: the offline ``report.html`` (``page``, ``baselines``), console tables (``console``) and the
README/docs markdown tables (``tables``)."""

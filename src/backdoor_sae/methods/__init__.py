"""Finding and removing the backdoor: trigger attribution (``attribution``), operating-point rules (``selection``),
trigger-known methods (``trigger_known``), trigger-agnostic methods (``agnostic``, ``keeping``) and detectors
(``detection``)."""

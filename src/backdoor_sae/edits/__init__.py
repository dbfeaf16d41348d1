"""Edits as hooks: the edit specs and their JSON form (``specs``), applying them (``apply``), the hook functions
(``hooks``) and learned masks (``masks``)."""

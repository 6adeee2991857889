"""The audit log's files and the ``fieldgate audit`` verbs over them (the chain itself is
pure, in ``gateway.core.audit``)."""

"""Deciding: anytime-valid sequential tests (:mod:`.sequential`) and the canary
policy that turns paired evidence into promote / roll back / wait (:mod:`.policy`)."""

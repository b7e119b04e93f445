"""Glue for training frameworks other than TRL (verl; OpenRLHF talks to the server's ``/get_reward`` directly)."""

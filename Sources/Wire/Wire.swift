// Wire module.

pytest_plugins = ["servers_fixtures"]

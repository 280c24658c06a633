"""What several test modules share: launchers, peers, fakes, factories.

A test module imports from here, never from another test module.
"""

# twistd -y relay.tac: the relay server as a .tac application.
#
# Configured by environment variables, each named after the twistd relay
# flag it stands for (see `twistd relay --help`):
#
#   RELAY_PORT                       port or endpoint string   (default 80)
#   RELAY_BLOCK_SIZE                 bytes                     (default 10240)
#   RELAY_INACTIVE_REQUEST_TIMEOUT   Go duration               (default 60s)
#   RELAY_INACTIVE_BACKEND_TIMEOUT   Go duration               (default 30m)
#   RELAY_MAX_REQUEST_BODY           bytes                     (default 104857600)
#   RELAY_LOG_LEVEL                  debug|info|warn|error     (default info)
#   RELAY_LOG_FORMAT                 json|text                 (default json)
#   RELAY_LOG_FILE                   path: log there (rotated like twistd.log)
#                                    instead of stderr; set it when
#                                    daemonized, where stderr goes nowhere
#
# Example: RELAY_PORT=8080 twistd -ny relay.tac

import os

from twisted.application.service import Application

from relay.tap import Options, makeService

flags = []
for name in Options.optParameters:
    value = os.environ.get("RELAY_" + name[0].upper())
    if value is not None:
        flags.append("--%s=%s" % (name[0], value))

options = Options()
options.parseOptions(flags)
if os.environ.get("RELAY_LOG_FILE"):
    # twistd_log_observer() reads twistd's own options from .parent.
    options.parent = {"nodaemon": False, "logfile": os.environ["RELAY_LOG_FILE"]}
application = Application("relay")
makeService(options).setServiceParent(application)

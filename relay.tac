# twistd -y relay.tac: the relay server as a .tac application.
#
# Configured by environment variables, each named after the twistd relay
# flag it stands for (RELAY_ and the flag's name in capitals, dashes as
# underscores; see `twistd relay --help` for what each does):
#
#   RELAY_PORT                          port or endpoint string     (default 80)
#   RELAY_BLOCK_SIZE                    bytes                       (default 10240)
#   RELAY_INACTIVE_REQUEST_TIMEOUT      Go duration                 (default 60s)
#   RELAY_INACTIVE_BACKEND_TIMEOUT      Go duration                 (default 30m)
#   RELAY_MAX_REQUEST_BODY              bytes                       (default 104857600)
#   RELAY_BUSY_POLL_US                  microseconds, 0 is off      (default 0)
#   RELAY_MAX_BUFFERED_BODIES           bytes                       (default 1073741824)
#   RELAY_CLIENT_TOKENS                 file of relay-client tokens (default none)
#   RELAY_USER_TOKENS                   file of user tokens         (default none)
#   RELAY_TRUSTED_USER_HEADER           header name                 (default none)
#   RELAY_MAX_PENDING_PER_BACKEND       requests                    (default 1000)
#   RELAY_MAX_BACKENDS                  backend names               (default 100000)
#   RELAY_MAX_HEADERS                   header lines                (default 500)
#   RELAY_MAX_HEADER_BYTES              bytes                       (default 65536)
#   RELAY_HEADER_TIMEOUT                Go duration                 (default 30s)
#   RELAY_DRAIN_GRACE                   Go duration, 0 is none      (default 5s)
#   RELAY_LOG_LEVEL                     debug|info|warn|error       (default info)
#   RELAY_LOG_FORMAT                    json|text                   (default json)
#   RELAY_ADMIN_PORT                    port or endpoint string     (default none: off)
#   RELAY_ADMIN_TOKEN_FILE              file of the admin token     (default none)
#   RELAY_INSPECT_HEADERS               1 or true: keep headers     (default off)
#   RELAY_PPROF_PORT                    accepted, ignored (Go's)    (default 0)
#   RELAY_TRACE_STACKDRIVER_PROJECT_ID  accepted, ignored (Go's)    (default none)
#
# Logs go where twistd's own options say: stderr with -n, else the
# --logfile (twistd.log by default; --logfile=- is stderr). One more
# variable overrides them:
#
#   RELAY_LOG_FILE                      path: log there (rotated like twistd.log)
#
# A bad value stops twistd with one line naming the variable.
#
# Example: RELAY_PORT=8080 twistd --pidfile= -ny relay.tac

import os
import sys

from twisted.application.service import Application
from twisted.python import usage

from relay.tap import Options, makeService, twistd_options


def _flags():
    for name in Options.optParameters:
        variable = "RELAY_" + name[0].upper().replace("-", "_")
        value = os.environ.get(variable)
        if value is not None:
            yield "--%s=%s" % (name[0], value)
    # On/off flags (--inspect_headers): on for 1, true or yes.
    for name in Options.optFlags:
        value = os.environ.get("RELAY_" + name[0].upper().replace("-", "_"), "")
        if value.strip().lower() in ("1", "true", "yes"):
            yield "--" + name[0]


options = Options()
try:
    options.parseOptions(list(_flags()))
except usage.UsageError as e:
    message = str(e)
    for name in Options.optParameters:
        message = message.replace("--%s=" % (name[0],), "RELAY_%s=" % (name[0].upper().replace("-", "_"),))
    raise SystemExit("relay.tac: %s" % (message,))
if os.environ.get("RELAY_LOG_FILE"):
    # twistd_log_observer() reads twistd's own options from .parent.
    options.parent = {"nodaemon": False, "logfile": os.environ["RELAY_LOG_FILE"]}
else:
    options.parent = twistd_options(sys.argv[1:])
application = Application("relay")
makeService(options).setServiceParent(application)

"""Hand a listening socket to a command the way systemd's socket activation does.

    python socket_activation_launcher.py FD python -m aserver ...

moves FD to fd 3, sets LISTEN_FDS=1 and LISTEN_PID to this process's pid, then execs
the command, which keeps the pid (so LISTEN_PID is right) and fd 3.
"""

import os
import sys

fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)  # the duplicate is inheritable
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])

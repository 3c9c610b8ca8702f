// Package api serves vmegress's local API on a unix socket: HTTP/1.1 and
// JSON under /v1, one thin handler per operation, each a call into the
// engine. Who may call is decided from the peer's credentials (SO_PEERCRED):
// root, or a member of the API group.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/vmegress/vmegress/internal/policy"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/events"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/state"
)

// Server holds the handlers' dependencies.
type Server struct {
	Engine *engine.Engine
	// Nameserver is the resolver address a project's guest should use.
	Nameserver func(state.Project) string
	// Group is the gid whose members may call besides root (-1: root only).
	Group int
	// CheckSSHPort refuses an SSH port the host itself uses (may be nil).
	CheckSSHPort func(port uint16, allowPrivileged bool) error
	// Counters are a project's open connections and verdict counts (may be nil).
	Counters func(project string) (active int64, conns, dns map[string]uint64)
	// Events is the decision and change stream (nil: /v1/events is 404).
	Events *events.Hub
	// DNS explains what the resolver would answer (POST /v1/explain; may be nil).
	DNS DNSExplainer
	// Status is what /v1/status answers.
	Status func(ctx context.Context) any
	// Resolved is what the running resolver handed out (explain decides an
	// address's tcp rules by it; may be nil).
	Resolved policy.Resolved
	// Applied says whether the data plane took the snapshot of generation
	// (nil error; Envoy: acknowledged it), for the changes that answer with
	// a generation (may be nil: always).
	Applied func(generation uint64) error
	Log     *slog.Logger
}

type peerKey struct{}

// peer is the caller's credentials.
type peer struct {
	uid, gid, pid int
	// groups are the caller's supplementary groups as the kernel recorded
	// them when it connected (SO_PEERGROUPS); nil when the kernel cannot say.
	groups []uint32
	ok     bool
}

// peerGroups reads SO_PEERGROUPS: the connecting process's supplementary
// groups at connect time (Linux 4.13+), so no later process reusing its pid
// can lend it other groups.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 64)
	for {
		n := uint32(len(buf) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e == unix.ERANGE && int(n/4) > len(buf) {
			buf = make([]uint32, n/4) // n is the size needed
			continue
		}
		if e != 0 {
			return nil, e
		}
		return buf[:n/4], nil
	}
}

// ConnContext records the caller's credentials for the handlers (set it as
// the http.Server's ConnContext).
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	var p peer
	if uc, ok := c.(*net.UnixConn); ok {
		if rc, err := uc.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					p = peer{uid: int(cred.Uid), gid: int(cred.Gid), pid: int(cred.Pid), ok: true}
					if gs, err := peerGroups(int(fd)); err == nil {
						p.groups = gs
						if p.groups == nil {
							p.groups = []uint32{}
						}
					}
				}
			})
		}
	}
	return context.WithValue(ctx, peerKey{}, p)
}

// permitted reports whether the caller is root or in the API group
// (primary, or supplementary as SO_PEERGROUPS recorded them at connect).
func (s *Server) permitted(r *http.Request) bool {
	p, _ := r.Context().Value(peerKey{}).(peer)
	if !p.ok {
		return false
	}
	if p.uid == 0 {
		return true
	}
	if s.Group < 0 {
		return false
	}
	if p.gid == s.Group {
		return true
	}
	if p.groups != nil {
		return slices.Contains(p.groups, uint32(s.Group))
	}
	// A kernel without SO_PEERGROUPS: the process's groups now.
	b, err := os.ReadFile("/proc/" + strconv.Itoa(p.pid) + "/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Groups:"); ok {
			for _, g := range strings.Fields(rest) {
				if g == strconv.Itoa(s.Group) {
					return true
				}
			}
		}
	}
	return false
}

// Handler is the API's routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /v1/projects/{name}", s.putProject)
	mux.HandleFunc("DELETE /v1/projects/{name}", s.deleteProject)
	mux.HandleFunc("GET /v1/projects", s.listProjects)
	mux.HandleFunc("GET /v1/projects/{name}", s.getProject)
	mux.HandleFunc("PUT /v1/projects/{name}/policy", s.putPolicy)
	mux.HandleFunc("GET /v1/events", s.getEvents)
	mux.HandleFunc("GET /v1/status", s.getStatus)
	mux.HandleFunc("POST /v1/explain", s.postExplain)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.permitted(r) {
			writeError(w, http.StatusForbidden, "", errors.New("not permitted: the API takes calls from root and members of the API group only"))
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, field string, err error) {
	writeJSON(w, status, client.ErrorBody{Error: err.Error(), Field: field})
}

// engineError maps an engine error to its status.
func engineError(w http.ResponseWriter, err error) {
	var inv *placement.Invalid
	switch {
	case errors.As(err, &inv):
		writeError(w, http.StatusBadRequest, inv.Field, err)
	case placement.IsConflict(err):
		writeError(w, http.StatusConflict, "", err)
	case config.IsInvalid(err):
		writeError(w, http.StatusBadRequest, "policy."+config.FirstField(err), err)
	case errors.Is(err, engine.ErrNotFound):
		writeError(w, http.StatusNotFound, "", err)
	default:
		writeError(w, http.StatusInternalServerError, "", err)
	}
}

// decode reads a JSON body strictly: unknown fields and trailing data are errors.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 4<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty body: every field takes its default
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			te.Field = strings.TrimPrefix(te.Field, "ProjectSpec.")
			return &placement.Invalid{Field: te.Field, Err: fmt.Errorf("invalid request body: %s must be a %s, not a JSON %s", te.Field, te.Type, te.Value)}
		}
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return &placement.Invalid{Field: strings.Trim(f, `"`), Err: fmt.Errorf("invalid request body: unknown field %s", f)}
		}
		return fmt.Errorf("invalid request body: %w", err)
	}
	if dec.More() {
		return errors.New("invalid request body: more than one JSON value")
	}
	return nil
}

func (s *Server) describe(p state.Project) client.Placement {
	ns := p.HostIP().String()
	if s.Nameserver != nil {
		ns = s.Nameserver(p)
	}
	return placement.Describe(p, ns)
}

// RequestFromSpec turns an API body into a placement request.
func RequestFromSpec(name string, spec client.ProjectSpec) (placement.Request, error) {
	req := placement.Request{Name: name, TAP: spec.TAP, Owner: spec.Owner, Group: spec.Group, SSHPort: spec.SSHPort, Egress: spec.Egress}
	if spec.Subnet != "" {
		pf, err := netip.ParsePrefix(spec.Subnet)
		if err != nil {
			return req, &placement.Invalid{Field: "subnet", Err: fmt.Errorf("subnet %q is not a CIDR prefix", spec.Subnet)}
		}
		req.Subnet = pf
	}
	return req, nil
}

// badRequest answers 400 with the field at fault when err names one.
func badRequest(w http.ResponseWriter, err error) {
	var inv *placement.Invalid
	if errors.As(err, &inv) {
		writeError(w, http.StatusBadRequest, inv.Field, err)
		return
	}
	writeError(w, http.StatusBadRequest, "", err)
}

// ParsePolicy validates a policy document of the API with the config
// file's rules ("" or "null": none).
func ParsePolicy(name string, raw json.RawMessage) (*config.Project, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	p, err := config.ParsePolicy("policy", name, raw)
	if err != nil {
		return nil, err
	}
	return &p, nil
}

func (s *Server) putProject(w http.ResponseWriter, r *http.Request) {
	var body struct {
		client.ProjectSpec
		Policy json.RawMessage `json:"policy"`
	}
	if err := decode(r, &body); err != nil {
		badRequest(w, err)
		return
	}
	spec := body.ProjectSpec
	pol, err := ParsePolicy(r.PathValue("name"), body.Policy)
	if err != nil {
		engineError(w, err)
		return
	}
	req, err := RequestFromSpec(r.PathValue("name"), spec)
	if err == nil && spec.SSHPort != 0 && s.CheckSSHPort != nil {
		if cur, ok := s.Engine.Snapshot().State.Projects[req.Name]; !ok || cur.SSHPort != spec.SSHPort {
			if cerr := s.CheckSSHPort(spec.SSHPort, spec.AllowPrivilegedSSHPort); cerr != nil {
				err = &placement.Conflict{Err: cerr}
			}
		}
	}
	if err != nil {
		engineError(w, err)
		return
	}
	p, changed, err := s.Engine.Place(r.Context(), req, pol)
	if err != nil {
		engineError(w, err)
		return
	}
	out := s.describe(p)
	out.Changed = changed
	out.Generation = s.Engine.Snapshot().Generation
	if !s.dataPlaneTook(w, out.Generation) {
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) deleteProject(w http.ResponseWriter, r *http.Request) {
	p, found, err := s.Engine.Remove(r.Context(), r.PathValue("name"))
	if err != nil {
		engineError(w, err)
		return
	}
	out := client.Removed{Project: r.PathValue("name"), Found: found, Generation: s.Engine.Snapshot().Generation}
	if found {
		out.TAP, out.Subnet = p.TAP, p.Subnet.String()
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) project(snap *engine.Snapshot, name string) (client.Project, bool) {
	out := client.Project{Name: name, Source: "api", Generation: snap.Generation, Policy: client.Policy{Allow: []client.Rule{}}}
	placed, isPlaced := snap.State.Projects[name]
	if isPlaced {
		d := s.describe(placed)
		d.Generation = snap.Generation
		out.Placement = &d
	}
	cp := snap.Config.Project(name)
	if cp == nil {
		return out, false
	}
	if snap.File.Project(name) != nil {
		out.Source = "file"
	}
	b, _ := json.Marshal(config.PolicyDocument(*cp))
	json.Unmarshal(b, &out.Policy)
	if s.Counters != nil {
		out.ActiveConnections, out.Connections, out.DNSQueries = s.Counters(name)
	}
	return out, true
}

func (s *Server) listProjects(w http.ResponseWriter, r *http.Request) {
	snap := s.Engine.Snapshot()
	out := []client.Project{}
	for _, cp := range snap.Config.Projects {
		if p, ok := s.project(snap, cp.Name); ok {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b client.Project) int { return strings.Compare(a.Name, b.Name) })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getProject(w http.ResponseWriter, r *http.Request) {
	p, ok := s.project(s.Engine.Snapshot(), r.PathValue("name"))
	if !ok {
		writeError(w, http.StatusNotFound, "", fmt.Errorf("no project %q", r.PathValue("name")))
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *Server) putPolicy(w http.ResponseWriter, r *http.Request) {
	raw, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil {
		badRequest(w, fmt.Errorf("reading the request body: %w", err))
		return
	}
	name := r.PathValue("name")
	pol, err := ParsePolicy(name, raw)
	if err == nil && pol == nil {
		err = &placement.Invalid{Field: "", Err: errors.New("the body must be a policy (mode, max_connections, allow)")}
	}
	if err != nil {
		engineError(w, err)
		return
	}
	gen, err := s.Engine.SetPolicy(r.Context(), *pol)
	if err != nil {
		engineError(w, err)
		return
	}
	if !s.dataPlaneTook(w, gen) {
		return
	}
	writeJSON(w, http.StatusOK, client.PolicyResult{Project: name, Generation: gen})
}

func (s *Server) getEvents(w http.ResponseWriter, r *http.Request) {
	if s.Events == nil {
		writeError(w, http.StatusNotFound, "", errors.New("no event stream"))
		return
	}
	q := r.URL.Query()
	f := events.Filter{Project: q.Get("project"), Verdict: q.Get("verdict")}
	for k := range q {
		if k != "project" && k != "verdict" {
			writeError(w, http.StatusBadRequest, k, fmt.Errorf("unknown query parameter %q (project, verdict)", k))
			return
		}
	}
	sub := s.Events.Subscribe(f)
	defer sub.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	flush := func() {}
	if fl, ok := w.(http.Flusher); ok {
		flush = fl.Flush
		fl.Flush()
	}
	// A reader that stops reading is cut off after eventWriteTimeout
	// instead of holding this handler (and its descriptor) forever.
	rc := http.NewResponseController(w)
	events.WriteStream(r.Context(), w, flush, sub, func() { rc.SetWriteDeadline(time.Now().Add(eventWriteTimeout)) })
}

func (s *Server) postExplain(w http.ResponseWriter, r *http.Request) {
	var req client.ExplainRequest
	if err := decode(r, &req); err != nil {
		badRequest(w, err)
		return
	}
	out, err := Explain(r.Context(), s.Engine.Snapshot().Policy, req, s.DNS, s.Resolved)
	if err != nil {
		engineError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getStatus(w http.ResponseWriter, r *http.Request) {
	if s.Status == nil {
		writeError(w, http.StatusNotFound, "", errors.New("no status"))
		return
	}
	writeJSON(w, http.StatusOK, s.Status(r.Context()))
}

// eventWriteTimeout bounds one write of the event stream to its reader.
const eventWriteTimeout = 10 * time.Second

// Listen opens the API's unix socket at path, mode 0660, group gid (-1:
// root's). A stale socket file from a previous run is replaced.
func Listen(path string, gid int) (net.Listener, error) {
	if err := os.MkdirAll(dirOf(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating the API socket's directory: %w", err)
	}
	if err := checkSocketDir(dirOf(path), os.Geteuid()); err != nil {
		return nil, err
	}
	os.Remove(path)
	old := unix.Umask(0o117) // the socket is born 0660, never wider
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("opening the API socket %s: %w", path, err)
	}
	if gid >= 0 {
		// Lchown: never follows a link put in the socket's place.
		if err := os.Lchown(path, 0, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("giving the API socket to group %d: %w", gid, err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("setting the API socket's mode: %w", err)
	}
	return ln, nil
}

// checkSocketDir refuses a socket directory in which another user could
// replace the socket (with their own, or with a link to a file the chown and
// chmod that follow would then give to the API group): dir and every
// directory above it must belong to root or euid, and be writable by no one
// else unless sticky (like /tmp, where others cannot rename what is ours).
func checkSocketDir(dir string, euid int) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("checking the API socket's directory: %w", err)
	}
	for d := abs; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("checking the API socket's directory: %w", err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("checking the API socket's directory %s: no owner", d)
		}
		if int(st.Uid) != 0 && int(st.Uid) != euid {
			return fmt.Errorf("the API socket's directory %s belongs to uid %d: that user could replace the socket", d, st.Uid)
		}
		if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
			return fmt.Errorf("the API socket's directory %s is writable by other users (mode %v): they could replace the socket", d, fi.Mode().Perm())
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

func dirOf(path string) string {
	if i := strings.LastIndexByte(path, '/'); i > 0 {
		return path[:i]
	}
	return "."
}

// dataPlaneTook answers 502 when the data plane did not take generation:
// the change is saved and in the engine's snapshot, but the data plane may
// still decide by an older one; the caller must not take it as in force.
func (s *Server) dataPlaneTook(w http.ResponseWriter, generation uint64) bool {
	if s.Applied == nil {
		return true
	}
	if err := s.Applied(generation); err != nil {
		writeError(w, http.StatusBadGateway, "", fmt.Errorf("the change is saved (generation %d) but the data plane did not take it: %w", generation, err))
		return false
	}
	return true
}

package envoy

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	// The typed_config messages the resources use, registered for protojson.
	_ "github.com/cncf/xds/go/xds/type/matcher/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/set_metadata/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/sni_dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/generic/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	_ "google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/vmegress/vmegress/internal/policy"
)

// NodeID is the node name vmegress's Envoy uses and the xDS server serves.
const NodeID = "vmegress"

// xdsCluster is the bootstrap's cluster for the xDS server.
const xdsCluster = "vmegress_xds"

func toProto(m M, msg proto.Message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return protojson.Unmarshal(b, msg)
}

// Resources builds the typed listener and clusters for pol.
func Resources(pol *policy.Policy, o Settings) (map[resourcev3.Type][]types.Resource, error) {
	res, _, err := resources(pol, o)
	return res, err
}

// resources is Resources, and the inject templates that could not be
// expanded (Secrets).
func resources(pol *policy.Policy, o Settings) (map[resourcev3.Type][]types.Resource, map[string]string, error) {
	sec, broken, err := Secrets(pol, o)
	if err != nil {
		return nil, nil, fmt.Errorf("building the Envoy secrets: %w", err)
	}
	o.brokenInject = broken
	l := &listenerv3.Listener{}
	if err := toProto(Listener(pol, o), l); err != nil {
		return nil, nil, fmt.Errorf("building the Envoy listener: %w", err)
	}
	out := map[resourcev3.Type][]types.Resource{resourcev3.ListenerType: {l}}
	for _, sm := range sec {
		s := &tlsv3.Secret{}
		if err := toProto(sm, s); err != nil {
			// The message only: the secret's value must not get into an error.
			return nil, nil, fmt.Errorf("building Envoy secret %v", sm["name"])
		}
		out[resourcev3.SecretType] = append(out[resourcev3.SecretType], s)
	}
	for _, cm := range clusters(pol, o) {
		c := &clusterv3.Cluster{}
		if err := toProto(cm, c); err != nil {
			return nil, nil, fmt.Errorf("building Envoy cluster %v: %w", cm["name"], err)
		}
		out[resourcev3.ClusterType] = append(out[resourcev3.ClusterType], c)
	}
	return out, broken, nil
}

// XDSBootstrap is the bootstrap of an Envoy that takes everything else from
// vmegress's xDS server on the unix socket xdsSocket.
func XDSBootstrap(o Settings, xdsSocket string) M {
	return M{
		"node":  M{"id": NodeID, "cluster": NodeID},
		"admin": admin(o),
		"dynamic_resources": M{
			"ads_config": M{"api_type": "GRPC", "transport_api_version": "V3",
				"grpc_services": []M{{"envoy_grpc": M{"cluster_name": xdsCluster}}}},
			"lds_config": M{"ads": M{}, "resource_api_version": "V3"},
			"cds_config": M{"ads": M{}, "resource_api_version": "V3"},
		},
		"static_resources": M{"clusters": []M{{
			"name": xdsCluster, "type": "STATIC", "connect_timeout": "1s",
			"typed_extension_protocol_options": M{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
				"envoy.extensions.upstreams.http.v3.HttpProtocolOptions", M{"explicit_http_config": M{"http2_protocol_options": M{}}})},
			"load_assignment": M{"cluster_name": xdsCluster, "endpoints": []M{{"lb_endpoints": []M{{
				"endpoint": M{"address": M{"pipe": M{"path": xdsSocket}}}}}}}},
		}}},
	}
}

// Server serves the compiled policy to Envoy over ADS.
type Server struct {
	cache   cachev3.SnapshotCache
	mu      sync.Mutex // serializes Update
	version int

	// AckTimeout bounds how long Update waits for Envoy to apply a snapshot
	// (zero: DefaultAckTimeout).
	AckTimeout time.Duration
	// RefreshInterval is how often certificates and secrets are rendered
	// again while serving (zero: DefaultRefreshInterval).
	RefreshInterval time.Duration
	// Log receives refresh errors (nil: none logged).
	Log *slog.Logger

	// The last policy pushed, its settings and its secrets' digest (guarded by mu).
	pol     *policy.Policy
	opt     Settings
	secrets string

	ackMu     sync.Mutex
	ackCh     chan struct{} // closed and replaced on every listener ACK or NACK
	sent      int           // the newest version handed to the cache
	acked     int           // the last listener version Envoy applied
	nacked    int           // the last listener version Envoy refused
	nackMsg   string
	listening bool // an Envoy asked for listeners: Updates wait for it
}

// DefaultAckTimeout is how long Update waits for Envoy to apply a change.
const DefaultAckTimeout = 5 * time.Second

// NewServer returns an xDS server with nothing to serve yet.
func NewServer() *Server {
	return &Server{cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil), ackCh: make(chan struct{})}
}

// Update pushes a new snapshot built from pol and, once an Envoy is
// connected, waits until it has applied it (its ACK of the listener
// version), so that when Update returns new connections are decided by
// pol. A refusal (NACK) or no answer within AckTimeout is an error; the
// previous configuration then stays in Envoy.
func (s *Server) Update(ctx context.Context, pol *policy.Policy, o Settings) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.update(ctx, pol, o, true)
}

// update pushes pol's resources; s.mu is held.
func (s *Server) update(ctx context.Context, pol *policy.Policy, o Settings, wait bool) error {
	res, broken, err := resources(pol, o)
	if err != nil {
		return err
	}
	s.pol, s.opt, s.secrets = pol, o, secretsDigest(res, broken)
	s.version++
	v := s.version
	snap, err := cachev3.NewSnapshot(strconv.Itoa(v), res)
	if err != nil {
		return fmt.Errorf("building the xDS snapshot: %w", err)
	}
	if err := snap.Consistent(); err != nil {
		return fmt.Errorf("inconsistent xDS snapshot: %w", err)
	}
	s.ackMu.Lock()
	s.sent = v
	s.ackMu.Unlock()
	if err := s.cache.SetSnapshot(ctx, NodeID, snap); err != nil {
		return err
	}
	if !wait {
		return nil
	}
	return s.waitAck(ctx, v)
}

// secretsDigest is a digest of res's secrets (their values never leave
// it) and of the inject templates that could not be expanded.
func secretsDigest(res map[resourcev3.Type][]types.Resource, broken map[string]string) string {
	h := sha256.New()
	keys := slices.Sorted(maps.Keys(broken))
	fmt.Fprintln(h, keys)
	for _, r := range res[resourcev3.SecretType] {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		h.Write(b)
	}
	return string(h.Sum(nil))
}

// DefaultRefreshInterval is how often the server renders the secrets again
// (a changed secret file, a certificate near its end) when RefreshInterval
// is zero.
const DefaultRefreshInterval = 2 * time.Second

// refresh renders the last policy's secrets again and pushes them when
// they changed (Envoy takes new SDS secrets without draining anything).
// An error keeps the secrets Envoy has and is logged without a value.
func (s *Server) refresh(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pol == nil || !s.pol.Terminates() {
		return
	}
	sec, broken, err := Secrets(s.pol, s.opt)
	if err == nil {
		res := map[resourcev3.Type][]types.Resource{}
		for _, sm := range sec {
			m := &tlsv3.Secret{}
			if err = toProto(sm, m); err != nil {
				err = fmt.Errorf("building Envoy secret %v", sm["name"])
				break
			}
			res[resourcev3.SecretType] = append(res[resourcev3.SecretType], m)
		}
		if err == nil && secretsDigest(res, broken) == s.secrets {
			return
		}
	}
	if err == nil {
		err = s.update(ctx, s.pol, s.opt, false)
	}
	if err != nil && s.Log != nil {
		s.Log.Error("renewing the certificates and secrets Envoy serves; it keeps the previous ones", "err", err.Error())
	}
}

// refreshLoop refreshes until ctx ends.
func (s *Server) refreshLoop(ctx context.Context) {
	every := s.RefreshInterval
	if every == 0 {
		every = DefaultRefreshInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.refresh(ctx)
		}
	}
}

func (s *Server) waitAck(ctx context.Context, v int) error {
	timeout := s.AckTimeout
	if timeout == 0 {
		timeout = DefaultAckTimeout
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		s.ackMu.Lock()
		listening, acked, nacked, msg, ch := s.listening, s.acked, s.nacked, s.nackMsg, s.ackCh
		s.ackMu.Unlock()
		switch {
		case !listening || acked >= v:
			return nil
		case nacked >= v:
			return fmt.Errorf("envoy refused configuration version %d: %s", v, msg)
		}
		select {
		case <-ch:
		case <-t.C:
			return fmt.Errorf("envoy did not apply configuration version %d within %s", v, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// onRequest notes Envoy's ACKs and NACKs of listener versions.
func (s *Server) onRequest(_ int64, req *discoverygrpc.DiscoveryRequest) error {
	if req.GetTypeUrl() != resourcev3.ListenerType {
		return nil
	}
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	s.listening = true
	v, err := strconv.Atoi(req.GetVersionInfo())
	if err != nil {
		return nil // the first request: nothing applied yet
	}
	if d := req.GetErrorDetail(); d != nil {
		// A NACK's version_info is the last version applied; the refused
		// one is the newest sent.
		s.nacked, s.nackMsg = s.sent, d.GetMessage()
	} else if v > s.acked {
		s.acked = v
	}
	close(s.ackCh)
	s.ackCh = make(chan struct{})
	return nil
}

// Serve answers xDS on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	gs := grpc.NewServer()
	srv := serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{StreamRequestFunc: s.onRequest})
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(gs, srv)
	listenerservice.RegisterListenerDiscoveryServiceServer(gs, srv)
	clusterservice.RegisterClusterDiscoveryServiceServer(gs, srv)
	go func() {
		<-ctx.Done()
		gs.Stop()
	}()
	go s.refreshLoop(ctx)
	if err := gs.Serve(ln); err != nil && ctx.Err() == nil {
		return fmt.Errorf("serving xDS: %w", err)
	}
	return nil
}

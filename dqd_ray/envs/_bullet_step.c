/* The hot path of a QD locomotion step in C, on pybullet's own physics client.
 *
 * QDLocomotionEnv.advance makes, per step, six pybullet calls (torques, step,
 * joint states, the parts' link states, the torso's state with velocity, the
 * feet contacts) and builds the observation from a few dozen Python floats.
 * Here one call does all of it on the same client: the torques, one step,
 * one actual-state request (joints, links with velocity, base), one contact
 * request, and the observation with the same double arithmetic in the same
 * order, so it is bit for bit the observation the Python path builds.
 *
 * The module reaches pybullet's C API through the pybullet extension that
 * Python already loaded (dlopen of its path, dlsym of the exported b3 calls).
 * pybullet keeps its clients in a file-local table; the Python side finds
 * that table's offset in the extension's ELF symbol table and hands it to
 * attach(). Every Stepper is checked against the Python path before use
 * (QDLocomotionEnv._attach_compiled in dqd_ray/envs/locomotion.py), and the
 * Python path stays the fallback.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first; it defines _GNU_SOURCE, which dlinfo needs */

#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <string.h>

/* Layouts and constants of pybullet 3.2.x's public C API (SharedMemoryPublic.h). */
typedef void *b3Client;
typedef void *b3Command;
typedef void *b3Status;

struct JointSensorState {
    double position;
    double velocity;
    double force_torque[6];
    double motor_torque;
};

struct LinkState {
    double world_position[3];
    double world_orientation[4];
    double local_inertial_position[3];
    double local_inertial_orientation[4];
    double world_link_frame_position[3];
    double world_link_frame_orientation[4];
    double world_linear_velocity[3];
    double world_angular_velocity[3];
    double world_aabb_min[3];
    double world_aabb_max[3];
};

struct ContactPointData {
    int contact_flags;
    int body_a;
    int body_b;
    int link_a;
    int link_b;
    double position_on_a[3];
    double position_on_b[3];
    double normal_on_b[3];
    double distance;
    double normal_force;
    double friction_force_1;
    double friction_force_2;
    double friction_dir_1[3];
    double friction_dir_2[3];
};

struct ContactInformation {
    int num_contact_points;
    struct ContactPointData *points;
};

enum {
    STATUS_ACTUAL_STATE_COMPLETED = 21,
    STATUS_STEP_COMPLETED = 26,
    STATUS_CONTACT_POINTS_COMPLETED = 39,
};

static struct {
    int (*can_submit)(b3Client);
    b3Status (*submit)(b3Client, b3Command);
    int (*status_type)(b3Status);
    int (*num_joints)(b3Client, int);
    b3Command (*joint_control_init)(b3Client, int, int);
    int (*set_force)(b3Command, int, double);
    b3Command (*step_init)(b3Client);
    b3Command (*state_init)(b3Client, int);
    int (*state_link_velocity)(b3Command, int);
    int (*actual_state)(b3Status, int *, int *, int *, const double **, const double **,
                        const double **, const double **);
    int (*joint_state)(b3Client, b3Status, int, struct JointSensorState *);
    int (*link_state)(b3Client, b3Status, int, struct LinkState *);
    b3Command (*contacts_init)(b3Client);
    void (*contacts_body_a)(b3Command, int);
    void (*contacts_body_b)(b3Command, int);
    void (*contacts_get)(b3Client, struct ContactInformation *);
    b3Client *clients; /* pybullet's table of clients, indexed by physicsClientId */
    Py_ssize_t num_clients;
} api;

static int attached = 0;

static PyObject *attach(PyObject *self, PyObject *args) {
    const char *path;
    unsigned long long offset;
    Py_ssize_t table_bytes;
    if (!PyArg_ParseTuple(args, "sKn", &path, &offset, &table_bytes)) return NULL;
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_RuntimeError, "pybullet's extension %s is not loaded: %s", path,
                     dlerror());
        return NULL;
    }
#define RESOLVE(field, name)                                                             \
    do {                                                                                 \
        *(void **)(&api.field) = dlsym(lib, name);                                       \
        if (api.field == NULL) {                                                         \
            PyErr_Format(PyExc_RuntimeError, "pybullet's extension lacks %s", name);     \
            return NULL;                                                                 \
        }                                                                                \
    } while (0)
    RESOLVE(can_submit, "b3CanSubmitCommand");
    RESOLVE(submit, "b3SubmitClientCommandAndWaitStatus");
    RESOLVE(status_type, "b3GetStatusType");
    RESOLVE(num_joints, "b3GetNumJoints");
    RESOLVE(joint_control_init, "b3JointControlCommandInit2");
    RESOLVE(set_force, "b3JointControlSetDesiredForceTorque");
    RESOLVE(step_init, "b3InitStepSimulationCommand");
    RESOLVE(state_init, "b3RequestActualStateCommandInit");
    RESOLVE(state_link_velocity, "b3RequestActualStateCommandComputeLinkVelocity");
    RESOLVE(actual_state, "b3GetStatusActualState");
    RESOLVE(joint_state, "b3GetJointState");
    RESOLVE(link_state, "b3GetLinkState");
    RESOLVE(contacts_init, "b3InitRequestContactPointInformation");
    RESOLVE(contacts_body_a, "b3SetContactFilterBodyA");
    RESOLVE(contacts_body_b, "b3SetContactFilterBodyB");
    RESOLVE(contacts_get, "b3GetContactPointInformation");
#undef RESOLVE
    struct link_map *map = NULL;
    if (dlinfo(lib, RTLD_DI_LINKMAP, &map) != 0 || map == NULL) {
        PyErr_Format(PyExc_RuntimeError, "no link map for %s: %s", path, dlerror());
        return NULL;
    }
    api.clients = (b3Client *)(map->l_addr + offset);
    api.num_clients = table_bytes / (Py_ssize_t)sizeof(b3Client);
    attached = 1;
    Py_RETURN_NONE;
}

#define MAX_JOINTS 16
#define MAX_PARTS 32
#define MAX_FEET 8

typedef struct {
    PyObject_HEAD
    int client_id;
    int body, floor, control_mode;
    int n_joints, n_parts, n_feet;
    int joint_ids[MAX_JOINTS], joint_u[MAX_JOINTS];
    double joint_mid[MAX_JOINTS], joint_half[MAX_JOINTS], torque_scale[MAX_JOINTS];
    int part_links[MAX_PARTS];
    int base_is_part, torso_link;
    int feet_links[MAX_FEET];
    Py_buffer speeds, feet, feet_prev; /* float32 arrays the env owns */
} Stepper;

static b3Client client_of(Stepper *s) {
    if (!attached || s->client_id < 0 || s->client_id >= api.num_clients) return NULL;
    return api.clients[s->client_id];
}

static int read_ints(PyObject *seq, int *out, int cap, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > cap) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: %zd entries, at most %d", what, n, cap);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (int)v;
    }
    Py_DECREF(fast);
    return (int)n;
}

static int read_doubles(PyObject *seq, double *out, int n, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: need %d entries", what, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static int float32_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t n, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
        return -1;
    if (view->itemsize != 4 || strcmp(view->format, "f") != 0 || view->len != n * 4) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s must be a writable float32 array of %zd", what, n);
        return -1;
    }
    return 0;
}

static void release_buffers(Stepper *s);

static void Stepper_dealloc(Stepper *s) {
    release_buffers(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static void release_buffers(Stepper *s) {
    if (s->speeds.obj) PyBuffer_Release(&s->speeds);
    if (s->feet.obj) PyBuffer_Release(&s->feet);
    if (s->feet_prev.obj) PyBuffer_Release(&s->feet_prev);
}

static int Stepper_init(Stepper *s, PyObject *args, PyObject *kw) {
    static char *names[] = {"client_id", "body", "floor", "control_mode", "joint_ids", "joint_u",
                            "joint_mid", "joint_half", "torque_scale", "part_links",
                            "base_is_part", "torso_link", "feet_links", "speeds", "feet",
                            "feet_prev", NULL};
    PyObject *joint_ids, *joint_u, *mid, *half, *scale, *parts, *feet_links;
    PyObject *speeds, *feet, *feet_prev;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiOOOOOOpiOOOO", names, &s->client_id,
                                     &s->body, &s->floor, &s->control_mode, &joint_ids, &joint_u,
                                     &mid, &half, &scale, &parts, &s->base_is_part,
                                     &s->torso_link, &feet_links, &speeds, &feet, &feet_prev))
        return -1;
    if (!attached) {
        PyErr_SetString(PyExc_RuntimeError, "attach() pybullet's extension first");
        return -1;
    }
    release_buffers(s); /* __init__ called again */
    if ((s->n_joints = read_ints(joint_ids, s->joint_ids, MAX_JOINTS, "joint_ids")) < 0) return -1;
    if (read_ints(joint_u, s->joint_u, MAX_JOINTS, "joint_u") != s->n_joints) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "joint_u: one per joint");
        return -1;
    }
    if (read_doubles(mid, s->joint_mid, s->n_joints, "joint_mid") < 0) return -1;
    if (read_doubles(half, s->joint_half, s->n_joints, "joint_half") < 0) return -1;
    if (read_doubles(scale, s->torque_scale, s->n_joints, "torque_scale") < 0) return -1;
    if ((s->n_parts = read_ints(parts, s->part_links, MAX_PARTS, "part_links")) < 0) return -1;
    if ((s->n_feet = read_ints(feet_links, s->feet_links, MAX_FEET, "feet_links")) < 0) return -1;
    if (s->n_parts + s->base_is_part == 0) {
        PyErr_SetString(PyExc_ValueError, "a robot needs at least one part");
        return -1;
    }
    if (float32_buffer(speeds, &s->speeds, s->n_joints, "speeds") < 0) return -1;
    if (float32_buffer(feet, &s->feet, s->n_feet, "feet") < 0) return -1;
    if (float32_buffer(feet_prev, &s->feet_prev, s->n_feet, "feet_prev") < 0) return -1;
    b3Client c = client_of(s);
    if (c == NULL) {
        PyErr_Format(PyExc_RuntimeError, "no pybullet client %d", s->client_id);
        return -1;
    }
    if (api.num_joints(c, s->body) <= 0) {
        PyErr_Format(PyExc_RuntimeError, "client %d has no body %d with joints", s->client_id,
                     s->body);
        return -1;
    }
    return 0;
}

/* The observation of QDLocomotionEnv._calc_state into obs (float32), with the
 * same double arithmetic in the same order. Returns the tuple
 * (z, pitch, x, y, initial_z, joints_at_limit, finite), or NULL. */
static PyObject *compute_state(Stepper *s, b3Client c, float *obs, double initial_z) {
    b3Command cmd = api.state_init(c, s->body);
    api.state_link_velocity(cmd, 1);
    b3Status st = api.submit(c, cmd);
    if (api.status_type(st) != STATUS_ACTUAL_STATE_COMPLETED) {
        PyErr_SetString(PyExc_RuntimeError, "pybullet: actual state request failed");
        return NULL;
    }
    const double *q = NULL, *qdot = NULL;
    api.actual_state(st, NULL, NULL, NULL, NULL, &q, &qdot, NULL);
    struct LinkState ls;
    double sx = 0.0, sy = 0.0;
    for (int i = 0; i < s->n_parts; i++) {
        if (!api.link_state(c, st, s->part_links[i], &ls)) goto bad_link;
        sx += ls.world_position[0];
        sy += ls.world_position[1];
    }
    int n_parts = s->n_parts;
    if (s->base_is_part) {
        sx += q[0];
        sy += q[1];
        n_parts += 1;
    }
    double x = sx / n_parts, y = sy / n_parts;
    double pos[3], orn[4], vel[3];
    if (s->torso_link < 0) {
        memcpy(pos, q, sizeof pos);
        memcpy(orn, q + 3, sizeof orn);
        memcpy(vel, qdot, sizeof vel);
    } else {
        if (!api.link_state(c, st, s->torso_link, &ls)) goto bad_link;
        memcpy(pos, ls.world_position, sizeof pos);
        memcpy(orn, ls.world_orientation, sizeof orn);
        memcpy(vel, ls.world_linear_velocity, sizeof vel);
    }
    double z = pos[2];
    if (isnan(initial_z)) initial_z = z;
    /* pybullet's getEulerFromQuaternion */
    double sqx = orn[0] * orn[0], sqy = orn[1] * orn[1], sqz = orn[2] * orn[2];
    double squ = orn[3] * orn[3];
    double sarg = -2 * (orn[0] * orn[2] - orn[3] * orn[1]);
    double roll, pitch, yaw;
    if (sarg <= -0.99999) {
        roll = 0;
        pitch = -0.5 * 3.14159265358979323846;
        yaw = 2 * atan2(orn[0], -orn[1]);
    } else if (sarg >= 0.99999) {
        roll = 0;
        pitch = 0.5 * 3.14159265358979323846;
        yaw = 2 * atan2(-orn[0], orn[1]);
    } else {
        roll = atan2(2 * (orn[1] * orn[2] + orn[3] * orn[0]), squ - sqx - sqy + sqz);
        pitch = asin(sarg);
        yaw = atan2(2 * (orn[0] * orn[1] + orn[3] * orn[2]), squ + sqx - sqy - sqz);
    }
    double angle = atan2(0.0 - y, 1e3 - x) - yaw;
    double cy = cos(yaw), sy_ = sin(yaw);
    double vx = cy * vel[0] + sy_ * vel[1];
    double vy = -sy_ * vel[0] + cy * vel[1];
    int k = 0;
    obs[k++] = (float)(z - initial_z);
    obs[k++] = (float)sin(angle);
    obs[k++] = (float)cos(angle);
    obs[k++] = (float)(0.3 * vx);
    obs[k++] = (float)(0.3 * vy);
    obs[k++] = (float)(0.3 * vel[2]);
    obs[k++] = (float)roll;
    obs[k++] = (float)pitch;
    struct JointSensorState js;
    float *speeds = (float *)s->speeds.buf;
    int at_limit = 0;
    for (int j = 0; j < s->n_joints; j++) {
        if (!api.joint_state(c, st, s->joint_ids[j], &js)) {
            PyErr_Format(PyExc_RuntimeError, "pybullet: no state for joint %d", s->joint_ids[j]);
            return NULL;
        }
        float rel = (float)((js.position - s->joint_mid[j]) / s->joint_half[j]);
        float speed = (float)(0.1 * js.velocity);
        obs[k++] = rel;
        obs[k++] = speed;
        speeds[j] = speed;
        if (fabsf(rel) > 0.99f) at_limit++;
    }
    const float *feet = (const float *)s->feet.buf;
    for (int f = 0; f < s->n_feet; f++) obs[k++] = feet[f];
    int finite = 1;
    for (int i = 0; i < k; i++) {
        float v = obs[i];
        /* np.maximum then np.minimum: a NaN stays NaN, an infinity is clipped */
        if (v < -5.0f) v = -5.0f;
        if (v > 5.0f) v = 5.0f;
        if (isnan(v)) finite = 0;
        obs[i] = v;
    }
    return Py_BuildValue("(dddddiO)", z, pitch, x, y, initial_z, at_limit,
                         finite ? Py_True : Py_False);
bad_link:
    PyErr_SetString(PyExc_RuntimeError, "pybullet: link state request failed");
    return NULL;
}

static int obs_buffer(Stepper *s, PyObject *obj, Py_buffer *view) {
    Py_ssize_t n = 8 + 2 * s->n_joints + s->n_feet;
    return float32_buffer(obj, view, n, "obs");
}

static PyObject *Stepper_state(Stepper *s, PyObject *args) {
    PyObject *obs_obj;
    double initial_z;
    if (!PyArg_ParseTuple(args, "Od", &obs_obj, &initial_z)) return NULL;
    b3Client c = client_of(s);
    if (c == NULL) return PyErr_Format(PyExc_RuntimeError, "pybullet client %d is gone",
                                       s->client_id);
    Py_buffer obs;
    if (obs_buffer(s, obs_obj, &obs) < 0) return NULL;
    PyObject *out = compute_state(s, c, (float *)obs.buf, initial_z);
    PyBuffer_Release(&obs);
    return out;
}

/* advance(action float64 (act,), obs float32 out, initial_z): torques, one
 * step, the observation (with the previous step's contacts), then the new
 * feet contacts (the previous ones are kept in feet_prev). */
static PyObject *Stepper_advance(Stepper *s, PyObject *args) {
    PyObject *act_obj, *obs_obj;
    double initial_z;
    if (!PyArg_ParseTuple(args, "OOd", &act_obj, &obs_obj, &initial_z)) return NULL;
    b3Client c = client_of(s);
    if (c == NULL) return PyErr_Format(PyExc_RuntimeError, "pybullet client %d is gone",
                                       s->client_id);
    Py_buffer act;
    if (PyObject_GetBuffer(act_obj, &act, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
    if (act.itemsize != 8 || strcmp(act.format, "d") != 0 || act.len != s->n_joints * 8) {
        PyBuffer_Release(&act);
        return PyErr_Format(PyExc_ValueError, "action must be float64 of %d", s->n_joints);
    }
    const double *a = (const double *)act.buf;
    b3Command cmd = api.joint_control_init(c, s->body, s->control_mode);
    for (int j = 0; j < s->n_joints; j++)
        api.set_force(cmd, s->joint_u[j], s->torque_scale[j] * a[j]);
    PyBuffer_Release(&act);
    api.submit(c, cmd);
    b3Status st = api.submit(c, api.step_init(c));
    if (api.status_type(st) != STATUS_STEP_COMPLETED) {
        PyErr_SetString(PyExc_RuntimeError, "pybullet: stepSimulation failed");
        return NULL;
    }
    Py_buffer obs;
    if (obs_buffer(s, obs_obj, &obs) < 0) return NULL;
    PyObject *out = compute_state(s, c, (float *)obs.buf, initial_z);
    PyBuffer_Release(&obs);
    if (out == NULL) return NULL;

    float *feet = (float *)s->feet.buf, *prev = (float *)s->feet_prev.buf;
    memcpy(prev, feet, sizeof(float) * s->n_feet);
    cmd = api.contacts_init(c);
    api.contacts_body_a(cmd, s->body);
    api.contacts_body_b(cmd, s->floor);
    st = api.submit(c, cmd);
    if (api.status_type(st) != STATUS_CONTACT_POINTS_COMPLETED) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "pybullet: contact point request failed");
        return NULL;
    }
    struct ContactInformation info;
    api.contacts_get(c, &info);
    for (int f = 0; f < s->n_feet; f++) {
        float touching = 0.0f;
        for (int i = 0; i < info.num_contact_points; i++) {
            if (info.points[i].link_a == s->feet_links[f]) {
                touching = 1.0f;
                break;
            }
        }
        feet[f] = touching;
    }
    return out;
}

static PyMethodDef Stepper_methods[] = {
    {"advance", (PyCFunction)Stepper_advance, METH_VARARGS,
     "advance(action, obs, initial_z) -> (z, pitch, x, y, initial_z, joints_at_limit, finite)"},
    {"state", (PyCFunction)Stepper_state, METH_VARARGS,
     "state(obs, initial_z) -> the same tuple, without a step or a contact update"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StepperType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dqd_ray.envs._bullet_step.Stepper",
    .tp_basicsize = sizeof(Stepper),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One robot's step on a pybullet client, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stepper_init,
    .tp_dealloc = (destructor)Stepper_dealloc,
    .tp_methods = Stepper_methods,
};

static PyMethodDef module_methods[] = {
    {"attach", attach, METH_VARARGS,
     "attach(pybullet_so_path, clients_table_offset, clients_table_bytes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bullet_step", "A QD locomotion step in C on pybullet's client.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__bullet_step(void) {
    if (PyType_Ready(&StepperType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&StepperType);
    if (PyModule_AddObject(m, "Stepper", (PyObject *)&StepperType) < 0) {
        Py_DECREF(&StepperType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
